"""The loader turns kernel-side failures into messages that name the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyflow.errors import KernelError
from pyflow.kernel import abi, build, loader
from pyflow.kernel.loader import FlowMeter, KernelSettings


def test_verifier_rejection_is_named(tmp_path: Path) -> None:
    shutil.copy(abi.BPF_DIR / "flowmeter.h", tmp_path)
    # reads packet memory without a bounds check: the verifier must refuse it
    (tmp_path / "flowmeter.c").write_text(
        "#include <uapi/linux/bpf.h>\n"
        "int pyflow_xdp(struct xdp_md *ctx) {\n"
        "    unsigned char *p = (unsigned char *)(long)ctx->data;\n"
        "    return p[20] == 7 ? XDP_DROP : XDP_PASS;\n"
        "}\n"
    )
    meter = FlowMeter(KernelSettings(cache_entries=64), bpf_dir=tmp_path)
    with pytest.raises(KernelError, match="verifier rejected pyflow_xdp"):
        meter.load()
    meter.close()


def test_compile_error_is_named(tmp_path: Path) -> None:
    (tmp_path / "flowmeter.c").write_text("this is not C\n")
    with pytest.raises(KernelError, match=r"compiling .*flowmeter\.c with bcc failed"):
        FlowMeter(KernelSettings(), bpf_dir=tmp_path).load()


def test_missing_headers_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(build, "headers_dir", lambda: tmp_path / "nothing-here")
    with pytest.raises(KernelError, match=r"kernel headers for .* not found"):
        build.check_environment()


def test_missing_interface_is_named() -> None:
    with pytest.raises(KernelError, match="no such interface: 'pyflow-nope0'"):
        loader.ifindex_of("pyflow-nope0")
