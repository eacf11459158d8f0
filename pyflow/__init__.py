"""pyflow: RouterOS-style IP Traffic Flow (NetFlow v1/v5/v9, IPFIX) for Linux, metered by eBPF."""

__version__ = "0.1.0"
