"""Flow export: information elements, templates and one encoder per wire format.

Everything here is pure (bytes in, bytes out); sockets, template clocks and
per-target state live with the caller.
"""
