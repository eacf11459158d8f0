"""Errors pyflow reports to its user: each names the problem and what to do."""


class PyflowError(Exception):
    """A fatal, user-facing error: the CLI prints it and exits non-zero."""

    exit_code = 1


class ConfigError(PyflowError):
    """The settings (flags, config file, RouterOS script) are wrong."""

    exit_code = 2


class KernelError(PyflowError):
    """The kernel side could not be set up (privileges, headers, verifier, attach)."""

    exit_code = 3
