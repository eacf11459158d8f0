"""``user``: the unprivileged user ``pyflow run`` becomes after its start (docs/security.md).

What it does to a running agent is tested on a real kernel in
tests/integration/test_privileges.py; here: the setting from every source,
its checks, the user lookup, and how the agent reaches bpffs once it is not root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyflow import cli
from pyflow.config import SettingError, Settings
from pyflow.errors import ConfigError
from pyflow.kernel import caps, pin


def load(argv: list[str]) -> Settings:
    return cli.settings_from_args(cli.build_parser().parse_args(argv))


def test_user_from_the_file_and_the_flag(tmp_path: Path) -> None:
    conf = tmp_path / "pyflow.toml"
    conf.write_text('[traffic-flow]\nenabled = "yes"\n[[target]]\ndst-address = "192.0.2.1"\n'
                    '[pyflow]\nuser = "pyflow"\n')
    assert load(["run", "--config", str(conf)]).user == "pyflow"
    assert load(["run", "--config", str(conf), "--user", ""]).user == ""  # the flag wins: stay root
    assert load(["run", "--target", "192.0.2.1:2055", "--user", "flowmeter"]).user == "flowmeter"
    assert load(["run", "--target", "192.0.2.1:2055"]).user == ""  # the default keeps uid 0


@pytest.mark.parametrize("bad", ["0day", "-x", "a b", "root;rm", "x" * 33, "Pyflow", "ü"])
def test_a_user_name_that_is_not_one_is_a_setting_error(bad: str) -> None:
    with pytest.raises(SettingError, match="is not a user name") as exc:
        Settings(user=bad)
    assert exc.value.exit_code == 2


def test_the_user_must_exist_and_not_be_root() -> None:
    with pytest.raises(ConfigError, match="does not exist: `make setup` creates the system user 'pyflow'"):
        caps.lookup_user("no-such-pyflow-user")
    with pytest.raises(ConfigError, match="not an unprivileged user"):
        caps.lookup_user("root")
    uid, gid = caps.lookup_user("nobody")
    assert uid > 0 and gid > 0


def test_bpffs_is_reached_through_the_held_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path("/sys/fs/bpf/pyflow")
    monkeypatch.setattr(pin, "_REACH", {base: 7})
    assert pin.reach(base / "netns-1" / "gen-2" / "flows") == Path("/proc/self/fd/7/netns-1/gen-2/flows")
    assert pin.reach(base) == Path("/proc/self/fd/7")
    assert pin.reach("/sys/fs/bpf/other") == Path("/sys/fs/bpf/other")  # not below it: as it is
    assert pin.reach(Path("/sys/fs/bpf/pyflowx/a")) == Path("/sys/fs/bpf/pyflowx/a")
    assert pin.reach_fds() == (7,)
