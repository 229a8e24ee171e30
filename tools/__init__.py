"""Developer tools of the repository (never imported by the package): the ahead-of-time compile gate
(:mod:`tools.aot`)."""
