"""Everything in deploy/ and the Vagrantfile, checked as far as this machine can without a hypervisor,
a container engine or a cluster:

* the Vagrantfile: Ruby's syntax check, then `vagrant validate` for both providers (VirtualBox with a
  stand-in VBoxManage, since Vagrant only asks it for its version); scripts/vm-kernel.sh's choice of
  kernel against this host's Debian package lists;
* the Containerfile: every COPY source exists and reaches the build context, its build steps are
  deploy/container-build.sh, and that script runs here in --dry-run mode on exactly what the COPYs
  put in the image, leaving a working pyflow;
* the Kubernetes manifests: strict schema validation offline (kubernetes-validate), and the wiring
  between them (ports, probes, labels, mounts, capabilities); the ConfigMap's pyflow.toml and the
  DaemonSet's arguments are checked by `pyflow check` itself;
* the collectors: pmacct's nfacctd runs the shipped config and decodes pyflow's IPFIX templates
  field by field with its aggregate; the systemd units pass `systemd-analyze verify`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

import pyflow
from pyflow.export import ipfix
from pyflow.export.ipfix import IpfixState
from tests.integration.procs import Proc
from tests.unit.test_ipfix import CLOCK, FLOW_V4, FLOW_V6, make_batch

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
COLLECTORS = DEPLOY / "collectors"
PYFLOW = Path(sys.executable).with_name("pyflow")


# --------------------------------------------------------------------------------------------
# Vagrantfile
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed (`sudo make setup` installs it)")
def test_vagrantfile_is_valid_ruby() -> None:
    res = subprocess.run(["ruby", "-c", str(REPO / "Vagrantfile")], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "Syntax OK", res.stdout + res.stderr


def vagrant(tmp_path: Path, *argv: str, provider: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "home"), VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
               VAGRANT_DEFAULT_PROVIDER=provider, VAGRANT_CHECKPOINT_DISABLE="1")  # fmt: skip
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["vagrant", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def vagrant_plugins(tmp_path: Path) -> str:
    return vagrant(tmp_path, "plugin", "list", provider="virtualbox").stdout


@pytest.mark.skipif(shutil.which("vagrant") is None,
                    reason="vagrant is not installed (`sudo make setup` installs it where the release packages it)")
@pytest.mark.parametrize("provider", ["virtualbox", "libvirt"])
def test_vagrant_validates_both_machines(tmp_path: Path, provider: str) -> None:
    """`vagrant validate` checks every machine's settings, the provider's options and the provisioners'
    files; VirtualBox's options are only checked when Vagrant finds VBoxManage, so a stand-in answers."""
    path = os.environ["PATH"]
    if provider == "libvirt" and "vagrant-libvirt" not in vagrant_plugins(tmp_path):
        pytest.skip("the vagrant-libvirt plugin is not installed")
    if provider == "virtualbox" and shutil.which("VBoxManage") is None:
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "VBoxManage").write_text('#!/bin/sh\n[ "$1" = --version ] && echo 7.0.20r163906\nexit 0\n')
        (fake / "VBoxManage").chmod(0o755)
        path = f"{fake}:{path}"
    res = vagrant(tmp_path, "validate", provider=provider, path=path)
    assert res.returncode == 0 and "validated successfully" in res.stdout, res.stdout + res.stderr
    status = vagrant(tmp_path, "status", "--machine-readable", provider=provider, path=path)
    machines = {line.split(",")[1] for line in status.stdout.splitlines() if ",provider-name," in line}
    assert machines == {"bookworm", "jammy"}, status.stdout


def test_vagrantfile_provisions_with_make_setup_and_the_kernel_script() -> None:
    text = (REPO / "Vagrantfile").read_text()
    assert 'path: "scripts/vm-kernel.sh", reboot: true' in text
    assert 'inline: "cd /vagrant && make setup"' in text
    for box in ("debian/bookworm64", "ubuntu/jammy64", "generic/ubuntu2204"):
        assert f'"{box}"' in text


def vm_kernel(release: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VM_KERNEL_RELEASE=release)
    return subprocess.run(["bash", str(REPO / "scripts" / "vm-kernel.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True)  # fmt: skip


@pytest.mark.skipif(shutil.which("apt-cache") is None or not Path("/etc/debian_version").exists(),
                    reason="needs Debian's package lists")  # fmt: skip
def test_vm_kernel_keeps_a_kernel_whose_headers_exist_and_replaces_one_whose_headers_are_gone() -> None:
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    deps = subprocess.run(["apt-cache", "depends", f"linux-headers-{arch}"], capture_output=True, text=True).stdout
    current = re.search(rf"Depends: linux-headers-(\S+-{arch})\b", deps)
    if current is None:
        pytest.skip(f"no linux-headers-{arch} in this host's package lists")
    res = vm_kernel(current.group(1))  # the archive's current kernel: its headers exist
    assert res.returncode == 0 and "nothing to do" in res.stdout, res.stdout + res.stderr
    abi = current.group(1).split("-")[0]
    res = vm_kernel(f"{abi}-1-{arch}")  # an ABI long superseded: Debian no longer has its headers
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"installing the current linux-image-{arch} and linux-headers-{arch}" in res.stdout
    res = vm_kernel("5.15.0-1-nosuchflavour")
    assert res.returncode == 1 and "no linux-image-nosuchflavour" in res.stderr


# --------------------------------------------------------------------------------------------
# Containerfile and deploy/container-build.sh
# --------------------------------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Containerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Containerfile ends in a continuation line"
    return out


def copies() -> list[tuple[list[str], str]]:
    result = []
    for word, args in containerfile():
        if word == "COPY":
            assert not args.startswith("--"), f"COPY {args}: no --from/--chown, the tests emulate plain copies"
            *sources, dest = shlex.split(args)
            result.append((sources, dest))
    return result


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the context) out of the build context."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]  # fmt: skip
    parts = Path(path).parts
    return any(fnmatch("/".join(parts[:i]), pat.removeprefix("**/")) or fnmatch(parts[i - 1], pat.removeprefix("**/"))
               for pat in patterns for i in range(1, len(parts) + 1))  # fmt: skip


def test_containerfile_copies_only_what_the_context_has() -> None:
    instructions = containerfile()
    assert instructions[0][0] == "FROM" and re.fullmatch(r"(docker\.io/(library/)?)?debian:bookworm(-slim)?",
                                                         instructions[0][1])  # fmt: skip
    assert copies(), "no COPY"
    for sources, _ in copies():
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the build context (the repository's root)"
            assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
    for needed in ("pyproject.toml", "setup.py", "README.md", "pyflow", "bpf"):  # what building pyflow reads
        assert any(needed in sources for sources, _ in copies()), f"{needed} is not copied into the image"


def run_steps() -> list[list[str]]:
    return [shlex.split(part) for word, args in containerfile() if word == "RUN" for part in args.split("&&")]


def test_containerfile_builds_with_the_script_and_runs_pyflow_with_its_config() -> None:
    (script_dest,) = [dest for sources, dest in copies() if sources == ["deploy/container-build.sh"]]
    first, *rest = run_steps()
    assert first == [script_dest, "/src"], "the build step is deploy/container-build.sh on the copied sources"
    assert rest == [["rm", "-rf", "/src"]]
    instructions = dict(containerfile())
    assert json.loads(instructions["ENTRYPOINT"]) == ["/opt/pyflow/bin/pyflow"]
    assert json.loads(instructions["CMD"]) == ["run", "--config", "/etc/pyflow/pyflow.toml", "--user", "pyflow"]
    assert "useradd --system" in (DEPLOY / "container-build.sh").read_text()  # the user --user names
    assert "PYFLOW_PREFIX:-/opt/pyflow}" in (DEPLOY / "container-build.sh").read_text()
    assert instructions["STOPSIGNAL"] == "SIGTERM"  # pyflow exports what is cached, then exits 0


def test_container_build_refuses_what_is_not_a_pyflow_tree(tmp_path: Path) -> None:
    env = dict(os.environ, PYFLOW_PREFIX=str(tmp_path / "prefix"))
    res = subprocess.run([str(DEPLOY / "container-build.sh"), "--dry-run", str(tmp_path)], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 1 and "is not a pyflow source tree" in res.stderr
    assert not (tmp_path / "prefix").exists()


def debian_release() -> str:
    try:
        lines = Path("/etc/os-release").read_text().splitlines()
    except OSError:
        return ""
    fields = dict(line.split("=", 1) for line in lines if "=" in line)
    return f"{fields.get('ID', '')}/{fields.get('VERSION_CODENAME', '')}".replace('"', "")


@pytest.mark.slow
@pytest.mark.skipif(debian_release() != "debian/bookworm",
                    reason="the dry run stands in for the image's Debian 12: it needs a Debian 12 host")
def test_container_build_dry_run_on_exactly_what_the_image_gets(tmp_path: Path) -> None:
    """Lay out an image root as the COPYs would, run the RUN step (apt simulated, the venv installed
    under that root), then use the result as the image would: from /, with the ConfigMap's config."""
    root = tmp_path / "image"
    for sources, dest in copies():
        target = root / dest.lstrip("/")
        for src in sources:
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                into = target / src if dest.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / src, into)
    script, src = run_steps()[0]
    prefix = root / "opt" / "pyflow"
    env = dict(os.environ, PYFLOW_PREFIX=str(prefix))
    res = subprocess.run([str(root / script.lstrip("/")), "--dry-run", str(root / src.lstrip("/"))], env=env,
                         cwd="/", capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"eBPF sources in {prefix}/lib/python3" in res.stdout
    pyflow_bin = prefix / "bin" / "pyflow"
    version = subprocess.run([str(pyflow_bin), "-V"], cwd="/", capture_output=True, text=True)
    assert version.stdout.strip() == f"pyflow {pyflow.__version__}"
    check = subprocess.run([str(pyflow_bin), "check", "--config", str(configmap_toml(tmp_path))], cwd="/",
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stderr


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for docs in manifests().values() for d in docs
            if d["kind"] != "Kustomization"}  # fmt: skip


def daemonset() -> dict[str, Any]:
    return resources()[("DaemonSet", "pyflow")]


def container() -> dict[str, Any]:
    (c,) = daemonset()["spec"]["template"]["spec"]["containers"]
    return c


def configmap_toml(tmp_path: Path) -> Path:
    path = tmp_path / "pyflow.toml"
    path.write_text(resources()[("ConfigMap", "pyflow-config")]["data"]["pyflow.toml"])
    return path


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    """Strict: an unknown or misspelt field fails too.  Against the oldest and the newest Kubernetes
    that kubernetes-validate bundles schemas for (offline: it reads them from its package)."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, all_versions

    versions = [all_versions()[0], all_versions()[-1]]
    unchecked = set()
    for name, docs in manifests().items():
        for doc in docs:
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except SchemaNotFoundError:
                    unchecked.add(doc["kind"])
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{name}: {doc['kind']} against Kubernetes {version}: "
                                         f"{'.'.join(map(str, exc.path))}: {exc.message}") from None  # fmt: skip
    assert unchecked == {"Kustomization", "ServiceMonitor"}  # no schema: a kustomize file, a CRD (checked below)


def test_kustomization_applies_everything_but_the_servicemonitor() -> None:
    (kustomization,) = manifests()["kustomization.yaml"]
    assert sorted(kustomization["resources"]) == sorted(
        name for name in manifests() if name not in ("kustomization.yaml", "servicemonitor.yaml"))


def test_everything_lives_in_one_namespace_under_its_own_account() -> None:
    namespaces = {key[1] for key in resources() if key[0] == "Namespace"}
    assert namespaces == {"pyflow"}
    for (kind, name), doc in resources().items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "pyflow", f"{kind}/{name}"
    spec = daemonset()["spec"]["template"]["spec"]
    assert ("ServiceAccount", spec["serviceAccountName"]) in resources()
    assert spec["automountServiceAccountToken"] is False  # pyflow never calls the API


def test_daemonset_runs_on_every_node_in_the_host_network_with_three_capabilities() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert not spec.get("hostPID") and not spec.get("hostIPC")
    assert {"operator": "Exists"} in spec["tolerations"]  # any taint, any effect
    assert spec["terminationGracePeriodSeconds"] >= 30  # time for the final export after SIGTERM
    sc = container()["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsUser"] == 0 and sc["readOnlyRootFilesystem"] is True
    # measured: BPF + PERFMON + NET_ADMIN load, attach and run the meter on Linux >= 5.11 (maps are
    # charged to the memory cgroup, no RLIMIT_MEMLOCK); without PERFMON the verifier rejects it
    # and SETUID, SETGID, CHOWN for the start to become the user pyflow (--user), then dropped
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "SETUID", "SETGID", "CHOWN"]}
    args = container()["args"]
    assert args[args.index("--user") + 1] == "pyflow"
    resources_ = container()["resources"]
    assert resources_["requests"]["memory"] and resources_["limits"]["memory"]


def test_daemonset_mounts_the_node_headers_read_only_and_bpffs_read_write() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    for path in ("/lib/modules", "/usr/src"):  # bcc compiles against the running kernel's headers
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
        assert mounts[path]["readOnly"] is True
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert not mounts["/sys/fs/bpf"].get("readOnly")
    assert "emptyDir" in volumes[mounts["/run/pyflow"]["name"]]  # the control socket, on a read-only root
    config = mounts["/etc/pyflow"]
    assert config["readOnly"] is True and "subPath" not in config  # subPath would never see an update
    (name,) = [v["configMap"]["name"] for v in spec["volumes"] if v["name"] == config["name"]]
    args = container()["args"]
    config_file = Path(args[args.index("--config") + 1])
    assert config_file.parent == Path("/etc/pyflow")
    assert config_file.name in resources()[("ConfigMap", name)]["data"]


def test_metrics_port_probe_annotations_service_and_servicemonitor_agree() -> None:
    c = container()
    args = c["args"]
    host, _, port = args[args.index("--metrics-address") + 1].rpartition(":")
    assert host == "$(NODE_IP)"
    assert {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in c["env"]
    (metrics,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == int(port)
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/metrics" and probe["port"] in ("metrics", int(port))
    assert "host" not in probe  # the pod's IP, which is the node's: where the endpoint listens
    template = daemonset()["spec"]["template"]["metadata"]
    assert template["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": port,
                                       "prometheus.io/path": "/metrics"}  # fmt: skip
    assert daemonset()["spec"]["selector"]["matchLabels"].items() <= template["labels"].items()
    service = resources()[("Service", "pyflow-metrics")]
    assert service["spec"]["selector"].items() <= template["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (int(port), "metrics")
    monitor = resources()[("ServiceMonitor", "pyflow")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [(service_port["name"], "/metrics")]


def test_image_is_this_version() -> None:
    image = container()["image"]
    assert image.rpartition(":")[2] == pyflow.__version__
    assert image.rpartition(":")[0].rpartition("/")[2] == "pyflow"


def test_configmap_and_daemonset_arguments_are_a_valid_pyflow_run(tmp_path: Path) -> None:
    """`pyflow check` takes what `pyflow run` takes: the DaemonSet's arguments, with the node's IP
    filled in as the kubelet does, on the ConfigMap's file."""
    args = [a.replace("$(NODE_IP)", "192.0.2.10") for a in container()["args"]]
    assert args[0] == "run"
    args[args.index("--config") + 1] = str(configmap_toml(tmp_path))
    res = subprocess.run([str(PYFLOW), "check", *args[1:]], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert re.search(r"^\s+enabled: yes$", res.stdout, re.M)
    assert re.search(r"^metrics-address: 192\.0\.2\.10:9796$", res.stdout, re.M)
    target = re.search(r"^0 (\S+)\s+(\S+)\s+(\d+)\s+(\S+)", res.stdout.split("/ip traffic-flow target print")[1],
                       re.M)  # SRC-ADDRESS DST-ADDRESS PORT VERSION, as RouterOS prints them
    assert target is not None and target.group(4) in ("9", "IPFIX")  # what both collectors below take


# --------------------------------------------------------------------------------------------
# Collectors: nfacctd (pmacct) and goflow2, into Kafka
# --------------------------------------------------------------------------------------------

NFACCTD_CONF = COLLECTORS / "nfacctd" / "nfacctd.conf"


def nfacctd_keys() -> dict[str, str]:
    keys = {}
    for line in NFACCTD_CONF.read_text().splitlines():
        if line.strip() and not line.startswith("!"):
            key, _, value = line.partition(":")
            keys[key.strip()] = value.strip()
    return keys


def configmap_target() -> tuple[int, str]:
    import tomllib

    (target,) = tomllib.loads(resources()[("ConfigMap", "pyflow-config")]["data"]["pyflow.toml"])["target"]
    return int(target["port"]), str(target["version"])


def test_collectors_listen_where_the_agents_send() -> None:
    port, version = configmap_target()
    assert version in ("9", "ipfix")
    assert int(nfacctd_keys()["nfacctd_port"]) == port
    env = dict(line.split("=", 1) for line in (COLLECTORS / "goflow2" / "goflow2.env").read_text().splitlines()
               if line and not line.startswith("#"))  # fmt: skip
    listen = env["GOFLOW2_LISTEN"]
    assert re.fullmatch(rf"netflow://:{port}(\?.*)?", listen), listen  # netflow:// takes v5, v9 and IPFIX
    unit = (COLLECTORS / "goflow2" / "goflow2.service").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", unit)) == set(env), "goflow2.env defines exactly what the unit uses"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pyflow_ipfix() -> list[bytes]:
    """pyflow's IPFIX for an IPv4 and an IPv6 flow, default templates (256/257) first."""
    messages, _ = ipfix.encode(make_batch(FLOW_V4, FLOW_V6), IpfixState(), CLOCK, True)
    return messages


@contextmanager
def nfacctd(conf: Path) -> Iterator[Proc]:
    """nfacctd on ``conf`` until the block ends (it stops on SIGINT, flushing its plugins); its
    times in UTC, whatever this host's zone."""
    proc = Proc(["env", "TZ=UTC", "nfacctd", "-f", str(conf)])
    try:
        proc.wait_for_line("waiting for NetFlow/IPFIX data", timeout=30)
        yield proc
    finally:
        proc.stop(signal.SIGINT)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def received(proc: Proc) -> int:
    """Datagrams nfacctd's core has read (it logs each one with debug on)."""
    return sum("Received NetFlow/IPFIX packet" in line for line in proc.lines)


def local_nfacctd_conf(tmp_path: Path, port: int) -> str:
    """The shipped file with only what must differ here: where it listens, logs and keeps templates,
    and a Kafka broker address where nothing listens; debug on, to see each datagram read."""
    brokers = nfacctd_keys()["kafka_broker_host[flows]"].split(",")
    replace = {"nfacctd_ip": "127.0.0.1", "nfacctd_port": str(port),
               "nfacctd_templates_file": str(tmp_path / "templates.json"),
               "kafka_broker_host[flows]": ",".join(["127.0.0.1:1"] * len(brokers))}  # fmt: skip
    lines = ["debug: true"]
    for line in NFACCTD_CONF.read_text().splitlines():
        key = line.partition(":")[0].strip()
        if key == "logfile":
            continue  # stderr instead
        lines.append(f"{key}: {replace[key]}" if key in replace else line)
    assert replace.keys() <= nfacctd_keys().keys()
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(shutil.which("nfacctd") is None, reason="nfacctd is not installed (`sudo make setup`)")
def test_nfacctd_runs_the_shipped_config_and_reads_pyflows_ipfix(tmp_path: Path) -> None:
    port = free_udp_port()
    conf = tmp_path / "nfacctd.conf"
    conf.write_text(local_nfacctd_conf(tmp_path, port))
    messages = pyflow_ipfix()
    with nfacctd(conf) as proc, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for message in messages:
            sock.sendto(message, ("127.0.0.1", port))
        wait_until(lambda: received(proc) >= len(messages), "nfacctd to read")
        # the templates it keeps across restarts (nfacctd_templates_file): pyflow's 256 and 257
        wait_until(lambda: (tmp_path / "templates.json").exists(), "nfacctd's templates file")
        templates = [json.loads(line) for line in (tmp_path / "templates.json").read_text().splitlines() if line]
        assert proc.p.poll() is None, proc.output()
    # (nfacctd 1.7.7 writes some ids in network byte order: 256 appears as 1, 257 stays 257)
    assert {256, 257} <= {i for t in templates for i in (int(t["template_id"]), socket.ntohs(int(t["template_id"])))}
    # the broker list is read as brokers (one lone host:port would be mangled: see the file)
    assert any("Connect to ipv4#127.0.0.1:1 failed" in line for line in proc.lines), proc.output()[-3000:]
    complaints = [line for line in proc.lines
                  if ("WARN" in line or "ERROR" in line) and "load_templates_from_file" not in line
                  and "( flows/kafka )" not in line]  # fmt: skip
    assert not complaints, "\n".join(complaints)  # e.g. "Unknown key", "Unknown primitive"


@pytest.mark.skipif(shutil.which("nfacctd") is None, reason="nfacctd is not installed (`sudo make setup`)")
def test_nfacctd_aggregate_carries_every_field_pyflow_sends(tmp_path: Path) -> None:
    """The shipped aggregate and lookup keys, on a print plugin instead of Kafka (same JSON encoder):
    each record comes out with pyflow's values, field by field."""
    keys = nfacctd_keys()
    port = free_udp_port()
    out = tmp_path / "flows.json"
    conf = tmp_path / "print.conf"
    conf.write_text("\n".join([
        "daemonize: false", "debug: true", "nfacctd_ip: 127.0.0.1", f"nfacctd_port: {port}",
        *(f"{k}: {keys[k]}" for k in ("nfacctd_net", "nfacctd_as", "use_ip_next_hop", "timestamps_secs")),
        "plugins: print[flows]", f"aggregate[flows]: {keys['aggregate[flows]']}",
        "print_output[flows]: json", f"print_output_file[flows]: {out}",
        "print_output_file_append[flows]: true", "print_refresh_time[flows]: 1",
    ]) + "\n")  # fmt: skip
    messages = pyflow_ipfix()
    with nfacctd(conf) as proc, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for message in messages:
            sock.sendto(message, ("127.0.0.1", port))
        wait_until(lambda: received(proc) >= len(messages), "nfacctd to read")
    records = {r["ip_src"]: r for r in map(json.loads, out.read_text().splitlines())}
    for flow in (FLOW_V4, FLOW_V6):
        r = records[str(flow["src_addr"])]
        assert (r["ip_dst"], r["port_src"], r["port_dst"], r["tos"]) == (
            flow["dst_addr"], flow["src_port"], flow["dst_port"], flow["tos"])
        assert r["ip_proto"] == {6: "tcp", 17: "udp"}[int(flow["protocol"])]
        assert int(r["tcp_flags"]) == flow["tcp_flags"]
        assert (r["packets"], r["bytes"]) == (flow["packets"], flow["bytes"])  # 64-bit, exact
        assert (r["iface_in"], r["iface_out"]) == (flow["ifindex"], flow["egress_ifindex"])
        assert (r["mask_src"], r["mask_dst"]) == (flow["src_mask"], flow["dst_mask"])
        assert (r["as_src"], r["as_dst"]) == (flow.get("src_as", 0), flow.get("dst_as", 0))
        assert r["peer_ip_dst"] == flow["next_hop"] and r["peer_ip_src"] == "127.0.0.1"
        for column, ms in (("timestamp_start", flow["start_ms"]), ("timestamp_end", flow["end_ms"])):
            shown = datetime.strptime(r[column], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
            assert round(shown.timestamp() * 1000) == ms, (column, r[column])


def verify_unit(unit_text: str, name: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    unit = tmp_path / name
    unit.write_text(unit_text)
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_collector_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong; goflow2 is no Debian package, so a stand-in binary
    takes its path (nfacctd's is the real one, when pmacct is installed)."""
    goflow2 = tmp_path / "goflow2"
    goflow2.write_text("#!/bin/sh\nexit 0\n")
    goflow2.chmod(0o755)
    text = (COLLECTORS / "goflow2" / "goflow2.service").read_text().replace("/usr/local/bin/goflow2", str(goflow2))
    res = verify_unit(text, "goflow2.service", tmp_path)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    if shutil.which("nfacctd") == "/usr/sbin/nfacctd":
        res = verify_unit((COLLECTORS / "nfacctd" / "nfacctd-kafka.service").read_text(), "nfacctd-kafka.service",
                          tmp_path)  # fmt: skip
        assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    unit = (COLLECTORS / "nfacctd" / "nfacctd-kafka.service").read_text()
    assert "KillSignal=SIGINT" in unit  # nfacctd ignores SIGTERM
    assert "daemonize: false" in NFACCTD_CONF.read_text()  # Type=simple


def test_grafana_dashboard_is_valid_and_names_only_documented_metrics() -> None:
    """examples/grafana-dashboard.json: loads, unique panel ids, no two panels on the same grid cell,
    and every pyflow metric a panel queries is in docs/metrics.md (the traffic analytics' ones too)."""
    dash = json.loads((REPO / "examples" / "grafana-dashboard.json").read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and not mine & cells, p["title"]
        cells |= mine
    docs = (REPO / "docs" / "metrics.md").read_text()
    names = {re.sub(r"_bucket$", "", n) for p in panels for t in p.get("targets", ())
             for n in re.findall(r"\bpyflow_[a-z_]+", t["expr"])}
    assert {"pyflow_traffic_bytes_total", "pyflow_traffic_flows_total", "pyflow_top_talker_bytes",
            "pyflow_top_port_bytes", "pyflow_unique_sources", "pyflow_anomaly_score",
            "pyflow_anomaly_active"} <= names
    assert not [n for n in names if f"`{n}`" not in docs]
