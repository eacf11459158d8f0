"""pyflow: RouterOS-style IP Traffic Flow (NetFlow v1/v5/v9, IPFIX) for Linux, metered by eBPF."""

import os

__version__ = "0.1.0"

# pyflow never multiplies matrices: one BLAS thread, started by numpy's import, would only cost
# memory and keep the capabilities the agent drops after its start (they are per thread).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
