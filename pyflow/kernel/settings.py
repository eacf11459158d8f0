"""What the kernel program is compiled with: the kernel layer's settings (no pyflow imports but errors)."""

from __future__ import annotations

from dataclasses import dataclass

from pyflow.errors import KernelError

#: The resume map holds flows that go on past their inactive timeout before the agent has taken
#: their expired entry out; sized from cache-entries, never below this.
RESUME_MIN = 1024


@dataclass(frozen=True)
class KernelSettings:
    """What the program is compiled with (passed as -D flags)."""

    cache_entries: int = 65536
    inactive_timeout_ns: int = 15_000_000_000
    end_idle_ns: int = 2_000_000_000
    max_ipv6_ext: int = 6
    # per-flow detail the kernel keeps (off = no per-packet or first-packet cost)
    ttl: bool = True  # min/max TTL, per packet
    length: bool = True  # min/max IP total length, per packet
    fib: bool = True  # out-interface + gateway by bpf_fib_lookup, per new flow at ingress
    own_export: bool = True  # skip the agent's own export datagrams (one lookup per UDP packet at TC egress)
    # RouterOS packet sampling: interval packets sampled, then space skipped (space 0: 1 in interval); 0 = off
    sampling_interval: int = 0
    sampling_space: int = 0
    # tests/bpf only: TC takes a VLAN tag from the skb mark into the skb (a test run cannot set one)
    test_vlan_from_mark: bool = False

    def __post_init__(self) -> None:
        # Only integers reach the compiler: a value that is not one cannot inject code.
        for name in ("cache_entries", "inactive_timeout_ns", "end_idle_ns", "max_ipv6_ext"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise KernelError(f"kernel setting {name}={value!r} is not a positive integer")
        for name in ("sampling_interval", "sampling_space"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 2**31:
                raise KernelError(f"kernel setting {name}={value!r} is not an integer in 0..2^31-1")
        if self.sampling_space and not self.sampling_interval:
            raise KernelError("sampling-space needs a sampling-interval")
        for name in ("ttl", "length", "fib", "own_export", "test_vlan_from_mark"):
            if type(getattr(self, name)) is not bool:
                raise KernelError(f"kernel setting {name}={getattr(self, name)!r} is not a boolean")

    @property
    def resume_entries(self) -> int:
        """Size of the resume map: a quarter of the cache, at least RESUME_MIN (docs/architecture.md)."""
        return max(RESUME_MIN, self.cache_entries // 4)

    def cflags(self) -> list[str]:
        return [
            f"-DCACHE_ENTRIES={self.cache_entries}",
            f"-DINACTIVE_NS={self.inactive_timeout_ns}ULL",
            f"-DEND_IDLE_NS={self.end_idle_ns}ULL",
            f"-DMAX_IPV6_EXT={self.max_ipv6_ext}",
            f"-DRESUME_ENTRIES={self.resume_entries}",
            f"-DPF_F_TTL={int(self.ttl)}",
            f"-DPF_F_LENGTH={int(self.length)}",
            f"-DPF_F_FIB={int(self.fib)}",
            f"-DPF_OWN_EXPORT={int(self.own_export)}",
            f"-DSAMPLING_INTERVAL={self.sampling_interval}",
            f"-DSAMPLING_SPACE={self.sampling_space}",
        ] + (["-DPF_TEST_VLAN_FROM_MARK=1"] if self.test_vlan_from_mark else [])
