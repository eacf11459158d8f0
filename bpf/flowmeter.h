/* SPDX-License-Identifier: Apache-2.0
 *
 * pyflow kernel/user ABI: the one definition of every struct and counter id
 * shared by the eBPF program (bpf/flowmeter.c) and the agent
 * (pyflow/kernel/abi.py).  tests/bpf/test_abi_layout.py pins the Python view
 * to what bcc generates from this file, so change both together.
 *
 * Layout rules: natural alignment, no implicit padding (hash keys are
 * compared byte for byte), sizes multiple of 8 where 64-bit fields exist.
 */
#ifndef PYFLOW_FLOWMETER_H
#define PYFLOW_FLOWMETER_H

#include <linux/types.h>

/* Flow key: one cache entry per distinct key. IPv4 addresses are stored
 * v4-mapped (::ffff:a.b.c.d) so both families share one 16-byte field. */
struct flow_key {
    __u8  src_addr[16];
    __u8  dst_addr[16];
    __u32 ifindex;      /* interface the packet was metered on */
    __u16 src_port;     /* TCP/UDP/SCTP source port; 0 for ICMP */
    __u16 dst_port;     /* TCP/UDP/SCTP destination port; ICMP: type*256+code */
    __u8  protocol;     /* IP protocol (IPv6: upper-layer after extension headers) */
    __u8  ip_version;   /* 4 or 6 */
    __u8  tos;          /* IPv4 TOS byte / IPv6 traffic class */
    __u8  direction;    /* 0 ingress, 1 egress (IPFIX flowDirection) */
    __u16 vlan_id;      /* outer 802.1Q/802.1ad VLAN id (12 bits), 0 = untagged:
                         * the skb's tag at TC (the stack has moved it out of
                         * the frame by then), else the frame's first tag */
    __u16 inner_vlan_id;/* QinQ: the tag inside the outer one, 0 = none */
};                      /* 48 bytes */

/* Flow value: cumulative since the entry was created. The agent exports
 * deltas against what it last exported; the kernel never resets it.
 * The first 48 bytes are written on every packet; the detail after them is
 * taken from the flow's first packet (MACs, VLAN, TCP seq/ack/window, ...),
 * except the min/max pairs, which follow every packet. */
struct flow_value {
    __u64 packets;
    __u64 bytes;          /* sum of IP total length (NetFlow octets) */
    __u64 first_seen_ns;  /* CLOCK_BOOTTIME, bpf_ktime_get_boot_ns() */
    __u64 last_seen_ns;
    __u64 flow_id;        /* unique per entry: cpu << 48 | per-CPU sequence */
    __u64 tcp_flags;      /* OR of TCP flags seen (low 8 bits used; 64-bit
                           * because bcc's LLVM only has 64-bit atomic OR) */
    __u8  src_mac[6];     /* 48: Ethernet source / destination */
    __u8  dst_mac[6];     /* 54 */
    __u16 reserved;       /* 60: zero (the VLAN ids are in the key) */
    __u16 length_min;     /* 62: IP total length, min / max over packets */
    __u16 length_max;     /* 64 */
    __u8  ttl_min;        /* 66: IPv4 TTL / IPv6 hop limit, min / max */
    __u8  ttl_max;        /* 67 */
    __u32 tcp_seq;        /* 68: first packet's TCP sequence number */
    __u32 tcp_ack;        /* 72: ... acknowledgement number */
    __u16 tcp_window;     /* 76: ... window */
    __u16 udp_length;     /* 78: first packet's UDP length field */
    __u32 flow_label;     /* 80: IPv6 flow label (20 bits) */
    __u32 in_ifindex;     /* 84: where the packet came in (TC egress: the
                           * skb's ingress interface, 0 = sent by this host) */
    __u32 out_ifindex;    /* 88: where it leaves: fib lookup at ingress (0 =
                           * delivered locally / not routed), the metered
                           * interface at TC egress */
    __u8  ip_header_length; /* 92: octets (IPv4 IHL*4, IPv6 40) */
    __u8  igmp_type;      /* 93 */
    __u8  pad[2];         /* 94 (ICMP type/code ride in the key's dst_port) */
    __u8  next_hop[16];   /* 96: gateway from the fib lookup (v4-mapped for
                           * IPv4); all zero = directly connected or unknown */
};                        /* 112 bytes */

/* The agent's own export datagrams (key: their UDP 4-tuple), never metered
 * so that a target reached over a metered interface makes no feedback loop. */
struct own_key {
    __u8  src_addr[16];   /* v4-mapped for IPv4, as in flow_key */
    __u8  dst_addr[16];
    __u16 src_port;
    __u16 dst_port;
};                        /* 36 bytes */

/* Per-CPU counters, per interface and hook (BPF_PERCPU_HASH "iface_stats",
 * key struct iface_key), read at scrape time.  Every packet the program sees
 * counts in PF_CNT_PACKETS_SEEN and in exactly one of: METERED (an entry of
 * the flow cache), RESUMED (an entry of the resume map), or one of the "not
 * metered" ids. */
enum pyflow_counter {
    PF_CNT_PACKETS_SEEN = 0,   /* every packet the program ran on */
    PF_CNT_METERED,            /* added to an entry of the flow cache */
    PF_CNT_RESUMED,            /* added to an entry of the resume map: a flow
                                * that went on while its expired entry waited
                                * for the agent to export and delete it */
    PF_CNT_NOT_IP,             /* not IPv4/IPv6 (ARP, LLDP, ...) */
    PF_CNT_UNPARSABLE,         /* truncated or malformed headers */
    PF_CNT_CACHE_FULL,         /* no room for a new flow entry */
    PF_CNT_RESUME_FULL,        /* its entry expired and no room in the resume map */
    PF_CNT_SAMPLED_OUT,        /* skipped by packet sampling */
    PF_CNT_OWN_EXPORT,         /* the agent's own export datagrams */
    PF_CNT_SWEEP_BEHIND,       /* its entries in both maps expired, neither
                                * deleted yet: the agent is a whole inactive
                                * timeout behind (stopped, or killed) */
    PF_CNT_MAX
};

/* Where a program runs (the "hook" metric label). */
/* The two maps that make up the flow cache (slots of "evict_before"). */
enum pyflow_cache_map {
    PF_MAP_FLOWS = 0,        /* "flows": cache-entries entries */
    PF_MAP_RESUMED = 1,      /* "resumed": flows that go on past their
                              * inactive timeout before the agent took the
                              * expired entry out (resume-entries) */
};

enum pyflow_hook {
    PF_HOOK_XDP = 0,         /* XDP, ingress */
    PF_HOOK_TC_INGRESS = 1,
    PF_HOOK_TC_EGRESS = 2,
};

struct iface_key {
    __u32 ifindex;
    __u32 hook;              /* enum pyflow_hook */
};

struct iface_stats {
    __u64 counters[PF_CNT_MAX];
    __u64 metered_bytes;     /* IP bytes of the METERED and RESUMED packets */
};

#endif /* PYFLOW_FLOWMETER_H */
