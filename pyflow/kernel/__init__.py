"""Everything that talks to the kernel: compile, load, attach, detach, read maps."""
