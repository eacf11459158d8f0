// SPDX-License-Identifier: Apache-2.0
/*
 * pyflow flow meter: one parser and one meter behind three entry points,
 * pyflow_xdp (XDP, ingress), pyflow_tc_ingress and pyflow_tc_egress (TC
 * clsact, direct action).
 *
 * Compiled at start by bcc.  Settings arrive as -D flags from
 * pyflow/kernel/loader.py:
 *   CACHE_ENTRIES     size of the flows hash map (RouterOS cache-entries)
 *   RESUME_ENTRIES    size of the resume map (from cache-entries)
 *   INACTIVE_NS       inactive-flow-timeout in ns: an entry idle this long is
 *                     never written again (its flow goes on in the resume map)
 *   END_IDLE_NS       idle time after which a flow that saw TCP FIN or RST
 *                     is over (same rule: never written again)
 *   MAX_IPV6_EXT      IPv6 extension headers skipped at most
 *   PF_F_TTL          1: keep min/max TTL per flow (a per-packet cost)
 *   PF_F_LENGTH       1: keep min/max IP total length per flow (per packet)
 *   PF_F_FIB          1: bpf_fib_lookup on a new flow's first packet at
 *                     ingress for the out-interface and gateway
 *   PF_OWN_EXPORT     1: skip the agent's own export datagrams (own_export)
 *   SAMPLING_INTERVAL RouterOS packet sampling: sampling-interval N packets
 *   SAMPLING_SPACE    sampled, then sampling-space M packets skipped; with
 *                     M = 0, one packet in N.  0/0 (the default) = off,
 *                     compiled out.  Counted per CPU.
 *
 * The program never changes traffic: every path returns XDP_PASS, or
 * TC_ACT_UNSPEC at TC (the packet goes on to the next filter or the qdisc's
 * default, exactly as if pyflow were not there; TC_ACT_OK would skip any
 * filter after ours).  Fields that are off cost nothing per packet.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/pkt_cls.h>

#include "flowmeter.h"

#ifndef CACHE_ENTRIES
#define CACHE_ENTRIES 65536
#endif
#ifndef INACTIVE_NS
#define INACTIVE_NS 15000000000ULL
#endif
#ifndef END_IDLE_NS
#define END_IDLE_NS 2000000000ULL
#endif
#ifndef MAX_IPV6_EXT
#define MAX_IPV6_EXT 6
#endif
#ifndef IFACE_ARRAY_IFINDEX
#define IFACE_ARRAY_IFINDEX 1024
#endif
#ifndef MAX_IFACE_STATS
#define MAX_IFACE_STATS 1024
#endif
#ifndef PF_F_TTL
#define PF_F_TTL 1
#endif
#ifndef PF_F_LENGTH
#define PF_F_LENGTH 1
#endif
#ifndef PF_F_FIB
#define PF_F_FIB 1
#endif
#ifndef PF_OWN_EXPORT
#define PF_OWN_EXPORT 1
#endif
#ifndef SAMPLING_INTERVAL
#define SAMPLING_INTERVAL 0
#endif
#ifndef SAMPLING_SPACE
#define SAMPLING_SPACE 0
#endif
#ifndef MAX_OWN_EXPORT
#define MAX_OWN_EXPORT 64
#endif
/* Linear bytes a TC program wants before parsing (pulled only when the
 * skb's linear part is shorter than this and than the packet). */
#define PF_PULL_LEN 128
#ifndef RESUME_ENTRIES
#define RESUME_ENTRIES 16384
#endif

#define PF_TCP_FIN 0x01
#define PF_TCP_RST 0x04

#define PF_ETH_P_8021Q  0x8100
#define PF_ETH_P_8021AD 0x88A8
#define PF_ETH_P_IP     0x0800
#define PF_ETH_P_IPV6   0x86DD
#define PF_IPPROTO_IGMP 2
#define PF_IPPROTO_SCTP 132
#define PF_IPPROTO_ICMPV6 58

BPF_TABLE("hash", struct flow_key, struct flow_value, flows, CACHE_ENTRIES);
/* A flow whose entry in "flows" has expired (the agent may be reading it for
 * the last time before deleting it) goes on here, as a new flow from its first
 * packet after the gap; and the other way round.  See "Exact deletes" in
 * docs/architecture.md: no packet is ever added to an expired entry. */
BPF_TABLE("hash", struct flow_key, struct flow_value, resumed, RESUME_ENTRIES);
/* Interface stats: a per-CPU array slot (ifindex * 3 + hook) for the usual
 * small ifindex (an array lookup is a bounds check and an add, a hash lookup
 * costs ~28 ns more per packet, see docs/benchmarks.md); a per-CPU hash for
 * the rest; an overflow slot when even that is full (never silently lost). */
BPF_PERCPU_ARRAY(iface_slots, struct iface_stats, IFACE_ARRAY_IFINDEX * 3);
BPF_PERCPU_HASH(iface_stats, struct iface_key, struct iface_stats, MAX_IFACE_STATS);
BPF_PERCPU_ARRAY(overflow_stats, struct iface_stats, 1);
/* Links whose packets start with the IP header, not an Ethernet one
 * (WireGuard, tun, GRE, IPIP, SIT: every ARPHRD but Ethernet and loopback):
 * 1 at their ifindex, written by the agent before it attaches there.  An
 * array for the usual small ifindex (an inlined lookup), a hash beyond. */
BPF_ARRAY(l3_links, __u8, IFACE_ARRAY_IFINDEX);
BPF_HASH(l3_links_big, __u32, __u8, MAX_IFACE_STATS);
BPF_PERCPU_ARRAY(flow_seq, __u64, 1);
/* Per-CPU count of flows that saw their first TCP FIN or RST (their end-idle
 * timeout, shorter than the inactive one, starts then): the agent sweeps an
 * end-idle timeout after it sees this move, and otherwise only as often as
 * the inactive timeout needs (docs/architecture.md, "Sweeps on time"). */
BPF_PERCPU_ARRAY(fin_seen, __u64, 1);

static __always_inline void count_fin(void)
{
    __u32 zero = 0;
    __u64 *n = fin_seen.lookup(&zero);
    if (n)
        *n += 1;
}
#if SAMPLING_INTERVAL > 0
/* Position in the sampling pattern, per CPU (no atomics on the packet path). */
BPF_PERCPU_ARRAY(sample_pos, __u64, 1);
#endif
BPF_HASH(own_export, struct own_key, __u8, MAX_OWN_EXPORT);
/* Update of this map-in-map from user space waits for an RCU grace period:
 * the agent's barrier between "read idle entries" and "delete them". */
BPF_ARRAY(barrier_inner, __u32, 1);
BPF_ARRAY_OF_MAPS(barrier, "barrier_inner", 1);
/* The agent's early export of a nearly full map (lack of resources), one slot
 * per cache map (enum pyflow_cache_map): an entry last seen before this
 * instant (boot clock) is expired, exactly like an idle one: never written
 * again, so the agent can export and delete it with the same exact protocol
 * (docs/reliability.md). */
BPF_ARRAY(evict_before, __u64, 2);

/* May this entry still be written?  Not once it has been idle for the
 * inactive timeout (END_IDLE_NS after FIN/RST), nor when the agent's
 * threshold for its map has passed it. */
static __always_inline int live(struct flow_value *v, __u64 now, __u32 map)
{
    __s64 idle = (__s64)(now - v->last_seen_ns);
    __s64 limit = (v->tcp_flags & (PF_TCP_FIN | PF_TCP_RST)) ? (__s64)END_IDLE_NS
                                                              : (__s64)INACTIVE_NS;
    if (idle >= limit)
        return 0;
    __u64 *t = evict_before.lookup(&map);
    return !(t && v->last_seen_ns < *t);
}

struct vlan_hdr_pf {
    __be16 tci;
    __be16 proto;
};

/* What the parser extracts from one packet.  Per-packet work stays small:
 * the first-packet detail of a new flow is read later, from the offsets
 * kept here (fill_first), only when an entry is created. */
struct pkt_meta {
    struct flow_key key;
    __u32 tcp_flags;
    __u64 bytes;          /* IP bytes; for a GSO/GRO skb, of all segments */
    __u32 packets;        /* 1, or the segments of a GSO/GRO skb */
    __u32 flow_label;
    __u16 length_min;     /* IP total length (GSO: smallest / largest segment) */
    __u16 length_max;
    __u32 l3_off;         /* offsets from the start of the frame */
    __u32 l4_off;         /* valid when has_l4 */
    __u8  ttl;
    __u8  ip_header_length;
    __u8  l4_header_length; /* TCP data offset / UDP 8, for GSO segment sizes */
    __u8  has_l4;         /* 0: no L4 header (non-first fragment, ...) */
};

static __always_inline struct iface_stats *stats_for(__u32 ifindex, __u32 hook)
{
    if (ifindex < IFACE_ARRAY_IFINDEX) {
        __u32 slot = ifindex * 3 + hook;
        return iface_slots.lookup(&slot);
    }
    struct iface_key k = {.ifindex = ifindex, .hook = hook};
    struct iface_stats zero = {};
    struct iface_stats *st = iface_stats.lookup_or_try_init(&k, &zero);
    if (st)
        return st;
    __u32 slot = 0;
    return overflow_stats.lookup(&slot);
}

enum parse_result { PARSE_OK = 0, PARSE_NOT_IP, PARSE_BAD };

static __always_inline int is_l3_link(__u32 ifindex)
{
    __u8 *l3 = ifindex < IFACE_ARRAY_IFINDEX ? l3_links.lookup(&ifindex) : l3_links_big.lookup(&ifindex);
    return l3 && *l3;
}

static __always_inline int parse_l4(void *data, void *l4, void *data_end, __u8 proto,
                                    struct pkt_meta *m)
{
    m->l4_off = (__u32)(l4 - data);
    m->has_l4 = 1;
    if (proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return PARSE_BAD;
        m->key.src_port = bpf_ntohs(th->source);
        m->key.dst_port = bpf_ntohs(th->dest);
        /* data offset and flags: bytes 12 and 13 of the TCP header */
        m->l4_header_length = (((__u8 *)th)[12] >> 4) * 4;
        m->tcp_flags = ((__u8 *)th)[13];
    } else if (proto == IPPROTO_UDP || proto == PF_IPPROTO_SCTP) {
        struct udphdr *uh = l4;   /* SCTP ports sit at the same offsets */
        if ((void *)(uh + 1) > data_end)
            return PARSE_BAD;
        m->key.src_port = bpf_ntohs(uh->source);
        m->key.dst_port = bpf_ntohs(uh->dest);
        m->l4_header_length = 8;
    } else if (proto == IPPROTO_ICMP || proto == PF_IPPROTO_ICMPV6) {
        __u8 *ic = l4;
        if ((void *)(ic + 2) > data_end)
            return PARSE_BAD;
        /* NetFlow convention: dst port = type * 256 + code, src port 0 */
        m->key.dst_port = ((__u16)ic[0] << 8) | ic[1];
    }
    return PARSE_OK;
}

static __always_inline int parse_ip(void *data, void *cur, void *data_end, struct pkt_meta *m, __u16 proto);

/* hw_vlan: the tag the stack already took out of the frame (TC: the skb's
 * vlan_tci, PF_HW_VLAN set when there is one; XDP: 0).  It is the outer tag;
 * the tags still in the frame follow it, outer first.  Only two count: a
 * third tag leaves an ethertype that is not IP (counted as not IP). */
#define PF_HW_VLAN 0x10000
static __always_inline int parse_packet(void *data, void *data_end,
                                        struct pkt_meta *m, __u32 hw_vlan, int l3)
{
    struct ethhdr *eth = data;
    void *cur;
    __u16 proto;

    if (l3) {
        /* no link-layer header: the IP version nibble says which */
        __u8 *v = data;
        if ((void *)(v + 1) > data_end)
            return PARSE_BAD;
        proto = (*v >> 4) == 4 ? PF_ETH_P_IP : (*v >> 4) == 6 ? PF_ETH_P_IPV6 : 0;
        cur = data;
    } else {
        if ((void *)(eth + 1) > data_end)
            return PARSE_BAD;
        proto = bpf_ntohs(eth->h_proto);
        cur = eth + 1;
        __u16 tag[2] = {0, 0};   /* the frame's own tags, outer first */
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (proto != PF_ETH_P_8021Q && proto != PF_ETH_P_8021AD)
                break;
            struct vlan_hdr_pf *vh = cur;
            if ((void *)(vh + 1) > data_end)
                return PARSE_BAD;
            tag[i] = bpf_ntohs(vh->tci) & 0x0FFF;
            proto = bpf_ntohs(vh->proto);
            cur = vh + 1;
        }
        if (hw_vlan & PF_HW_VLAN) {   /* the stack's tag is the outer one */
            m->key.vlan_id = hw_vlan & 0x0FFF;
            m->key.inner_vlan_id = tag[0];
        } else {
            m->key.vlan_id = tag[0];
            m->key.inner_vlan_id = tag[1];
        }
    }
    m->l3_off = (__u32)(cur - data);
    return parse_ip(data, cur, data_end, m, proto);
}

/* The IP header at ``cur`` (``proto``: its ethertype) and what follows it. */
static __always_inline int parse_ip(void *data, void *cur, void *data_end, struct pkt_meta *m, __u16 proto)
{
    if (proto == PF_ETH_P_IP) {
        struct iphdr *iph = cur;
        if ((void *)(iph + 1) > data_end)
            return PARSE_BAD;
        /* version/ihl read as a byte: no reliance on bitfield order */
        __u8 vihl = *(__u8 *)iph;
        __u32 ihl = (vihl & 0x0F) * 4;
        __u16 tot = bpf_ntohs(iph->tot_len);
        if ((vihl >> 4) != 4 || ihl < sizeof(*iph) || tot < ihl)
            return PARSE_BAD;
        m->key.ip_version = 4;
        m->key.protocol = iph->protocol;
        m->key.tos = iph->tos;
        m->ttl = iph->ttl;
        m->ip_header_length = ihl;
        m->bytes = tot;
        m->key.src_addr[10] = 0xff;
        m->key.src_addr[11] = 0xff;
        m->key.dst_addr[10] = 0xff;
        m->key.dst_addr[11] = 0xff;
        __builtin_memcpy(&m->key.src_addr[12], &iph->saddr, 4);
        __builtin_memcpy(&m->key.dst_addr[12], &iph->daddr, 4);
        /* Non-first fragments carry no L4 header: ports stay 0. */
        if (iph->frag_off & bpf_htons(0x1FFF))
            return PARSE_OK;
        void *l4 = cur + ihl;
        if (l4 > data_end)
            return PARSE_BAD;
        return parse_l4(data, l4, data_end, iph->protocol, m);
    }

    if (proto == PF_ETH_P_IPV6) {
        struct ipv6hdr *ip6 = cur;
        if ((void *)(ip6 + 1) > data_end)
            return PARSE_BAD;
        __u8 *w = (__u8 *)ip6;   /* version(4) traffic class(8) flow label(20) */
        if ((w[0] >> 4) != 6)
            return PARSE_BAD;
        m->key.ip_version = 6;
        m->key.tos = (__u8)((w[0] << 4) | (w[1] >> 4));
        m->flow_label = ((__u32)(w[1] & 0x0F) << 16) | ((__u32)w[2] << 8) | w[3];
        m->ttl = ip6->hop_limit;
        m->ip_header_length = sizeof(*ip6);
        m->bytes = (__u64)bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
        __builtin_memcpy(m->key.src_addr, &ip6->saddr, 16);
        __builtin_memcpy(m->key.dst_addr, &ip6->daddr, 16);
        __u8 next = ip6->nexthdr;
        void *l4 = ip6 + 1;
#pragma unroll
        for (int i = 0; i < MAX_IPV6_EXT; i++) {
            if (next == 0 || next == 43 || next == 60) {
                /* hop-by-hop, routing, destination options */
                __u8 *eh = l4;
                if ((void *)(eh + 2) > data_end)
                    return PARSE_BAD;
                next = eh[0];
                l4 = l4 + ((__u32)eh[1] + 1) * 8;
            } else if (next == 44) {
                /* fragment header: 8 bytes, offset in bits 3..15 of bytes 2-3 */
                __u8 *eh = l4;
                if ((void *)(eh + 8) > data_end)
                    return PARSE_BAD;
                next = eh[0];
                /* Non-first fragment: what follows is the middle of the
                 * fragmentable part, payload and not headers.  Stop here:
                 * protocol = this header's next header, ports 0. */
                if (((eh[2] << 8) | eh[3]) & 0xFFF8) {
                    m->key.protocol = next;
                    return PARSE_OK;
                }
                l4 = l4 + 8;
            } else if (next == 51) {
                /* authentication header: (len + 2) * 4 bytes */
                __u8 *eh = l4;
                if ((void *)(eh + 2) > data_end)
                    return PARSE_BAD;
                next = eh[0];
                l4 = l4 + ((__u32)eh[1] + 2) * 4;
            } else {
                break;
            }
        }
        m->key.protocol = next;
        if (next == 0 || next == 43 || next == 44 || next == 60 || next == 51)
            return PARSE_BAD;   /* more extension headers than MAX_IPV6_EXT */
        if (next == 59 /* no next header */)
            return PARSE_OK;
        if (l4 > data_end)
            return PARSE_BAD;
        return parse_l4(data, l4, data_end, next, m);
    }
    return PARSE_NOT_IP;
}

/* Add one packet to a live entry (the caller checked live()). */
static __always_inline void add_to_entry(struct iface_stats *st, struct flow_value *v,
                                         struct pkt_meta *m, __u64 now, __u32 counter)
{
    __sync_fetch_and_add(&v->packets, m->packets);
    __sync_fetch_and_add(&v->bytes, m->bytes);
    if ((__s64)(now - v->last_seen_ns) > 0)
        v->last_seen_ns = now;
    if (m->tcp_flags & ~v->tcp_flags) {
        if ((m->tcp_flags & (PF_TCP_FIN | PF_TCP_RST)) && !(v->tcp_flags & (PF_TCP_FIN | PF_TCP_RST)))
            count_fin();
        __sync_fetch_and_or(&v->tcp_flags, m->tcp_flags);
    }
    /* min/max: plain stores, written only when they change.  Two CPUs racing
     * on one flow can at worst keep the less extreme of two new values. */
#if PF_F_TTL
    if (m->ttl < v->ttl_min)
        v->ttl_min = m->ttl;
    if (m->ttl > v->ttl_max)
        v->ttl_max = m->ttl;
#endif
#if PF_F_LENGTH
    if (m->length_min < v->length_min)
        v->length_min = m->length_min;
    if (m->length_max > v->length_max)
        v->length_max = m->length_max;
#endif
    st->counters[counter] += m->packets;
    st->metered_bytes += m->bytes;
}

/* Where the first packet of a new flow goes: the fib's answer at ingress
 * (out-interface and gateway), as the kernel will route it. */
static __always_inline void fib_first(void *ctx, struct flow_value *nv, struct pkt_meta *m)
{
#if PF_F_FIB
    struct bpf_fib_lookup fib = {};
    fib.ifindex = m->key.ifindex;
    fib.l4_protocol = m->key.protocol;
    fib.sport = bpf_htons(m->key.src_port);
    fib.dport = bpf_htons(m->key.dst_port);
    fib.tot_len = m->length_max;
    if (m->key.ip_version == 4) {
        fib.family = 2;  /* AF_INET */
        fib.tos = m->key.tos;
        __builtin_memcpy(&fib.ipv4_src, &m->key.src_addr[12], 4);
        __builtin_memcpy(&fib.ipv4_dst, &m->key.dst_addr[12], 4);
    } else {
        fib.family = 10; /* AF_INET6 */
        fib.flowinfo = bpf_htonl(((__u32)m->key.tos << 20) | m->flow_label);
        __builtin_memcpy(fib.ipv6_src, m->key.src_addr, 16);
        __builtin_memcpy(fib.ipv6_dst, m->key.dst_addr, 16);
    }
    long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    /* NO_NEIGH: routed, but the next hop's MAC is not resolved yet; the
     * interface and gateway are filled all the same. */
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        return;
    nv->out_ifindex = fib.ifindex;
    /* The lookup leaves the destination there for a directly connected
     * route and puts the gateway there otherwise. */
    if (m->key.ip_version == 4) {
        __u32 dst;
        __builtin_memcpy(&dst, &m->key.dst_addr[12], 4);
        if (fib.ipv4_dst != dst) {
            nv->next_hop[10] = 0xff;
            nv->next_hop[11] = 0xff;
            __builtin_memcpy(&nv->next_hop[12], &fib.ipv4_dst, 4);
        }
    } else {
        /* no memcmp: bcc's LLVM would emit a library call */
        __u32 dst[4];
        __builtin_memcpy(dst, m->key.dst_addr, 16);
        if ((fib.ipv6_dst[0] ^ dst[0]) | (fib.ipv6_dst[1] ^ dst[1]) |
            (fib.ipv6_dst[2] ^ dst[2]) | (fib.ipv6_dst[3] ^ dst[3]))
            __builtin_memcpy(nv->next_hop, fib.ipv6_dst, 16);
    }
#endif
}

/* The detail of a new flow, from its first packet. */
static __always_inline void fill_first(void *data, void *data_end, struct flow_value *nv,
                                       struct pkt_meta *m)
{
    __u8 *eth = data;
    if (m->l3_off >= 12 && (void *)(eth + 12) <= data_end) {   /* none on an L3 link */
        __builtin_memcpy(nv->dst_mac, eth, 6);
        __builtin_memcpy(nv->src_mac, eth + 6, 6);
    }
    nv->ttl_min = m->ttl;
    nv->ttl_max = m->ttl;
    nv->length_min = m->length_min;
    nv->length_max = m->length_max;
    nv->ip_header_length = m->ip_header_length;
    nv->flow_label = m->flow_label;
    if (!m->has_l4)
        return;
    __u32 off = m->l4_off;
    if (off > 1023)
        return;
    __u8 *l4 = data + off;
    __u8 proto = m->key.protocol;
    if (proto == IPPROTO_TCP) {
        if ((void *)(l4 + 16) > data_end)
            return;
        nv->tcp_seq = bpf_ntohl(*(__be32 *)(l4 + 4));
        nv->tcp_ack = bpf_ntohl(*(__be32 *)(l4 + 8));
        nv->tcp_window = bpf_ntohs(*(__be16 *)(l4 + 14));
    } else if (proto == IPPROTO_UDP) {
        if ((void *)(l4 + 8) > data_end)
            return;
        nv->udp_length = bpf_ntohs(*(__be16 *)(l4 + 4));
    } else if (proto == PF_IPPROTO_IGMP) {
        if ((void *)(l4 + 1) > data_end)
            return;
        nv->igmp_type = l4[0];
    }
}

/* A new entry for this packet's flow, from its first packet. */
static __always_inline void new_entry(void *ctx, void *data, void *data_end, struct flow_value *nv,
                                      struct pkt_meta *m, __u32 hook, __u32 in_ifindex, __u64 now,
                                      __u64 id)
{
    nv->packets = m->packets;
    nv->bytes = m->bytes;
    nv->first_seen_ns = now;
    nv->last_seen_ns = now;
    nv->flow_id = id;
    nv->tcp_flags = m->tcp_flags;
    nv->in_ifindex = in_ifindex;
    fill_first(data, data_end, nv, m);
    if (hook == PF_HOOK_TC_EGRESS)
        nv->out_ifindex = m->key.ifindex;
    else
        fib_first(ctx, nv, m);
}

/* flow_seq: per-CPU count of entries created (their sum is the flows-created
 * metric) and the source of unique flow ids: cpu << 48 | sequence. */
static __always_inline __u64 *next_id(__u64 *id)
{
    __u32 zero = 0;
    __u64 *seq = flow_seq.lookup(&zero);
    *id = 0;
    if (seq) {
        *seq += 1;
        *id = ((__u64)bpf_get_smp_processor_id() << 48) | (*seq & 0xFFFFFFFFFFFFULL);
    }
    return seq;
}

/* The packet's flow has no live entry: create one in "flows" if the flow has
 * no entry there at all, else (its entry there expired, waiting to be
 * exported and deleted) in "resumed".  Losing the insert race to another CPU
 * falls back to the winner's entry. */
static __always_inline void create(void *ctx, void *data, void *data_end, struct iface_stats *st,
                                   struct pkt_meta *m, __u32 hook, __u32 in_ifindex, __u64 now,
                                   int in_flows)
{
    __u64 id;
    __u64 *seq = next_id(&id);
    struct flow_value nv = {};
    new_entry(ctx, data, data_end, &nv, m, hook, in_ifindex, now, id);
    int err = in_flows ? flows.insert(&m->key, &nv) : resumed.insert(&m->key, &nv);
    if (err == 0) {
        if (m->tcp_flags & (PF_TCP_FIN | PF_TCP_RST))
            count_fin();
        st->counters[in_flows ? PF_CNT_METERED : PF_CNT_RESUMED] += m->packets;
        st->metered_bytes += m->bytes;
        return;
    }
    if (seq)
        *seq -= 1;   /* not created; the same CPU, so the id is simply reused */
    struct flow_value *v = in_flows ? flows.lookup(&m->key) : resumed.lookup(&m->key);
    if (v && live(v, now, in_flows ? PF_MAP_FLOWS : PF_MAP_RESUMED)) {
        add_to_entry(st, v, m, now, in_flows ? PF_CNT_METERED : PF_CNT_RESUMED);
        return;
    }
    if (v)
        st->counters[PF_CNT_SWEEP_BEHIND] += m->packets;  /* created and expired meanwhile */
    else
        st->counters[in_flows ? PF_CNT_CACHE_FULL : PF_CNT_RESUME_FULL] += m->packets;
}

/* Each flow has at most one live entry, in "flows" or in "resumed"; packets
 * only ever go to a live one (see "Exact deletes" in docs/architecture.md). */
static __always_inline void meter(void *ctx, void *data, void *data_end, struct iface_stats *st,
                                  struct pkt_meta *m, __u32 hook, __u32 in_ifindex)
{
    __u64 now = bpf_ktime_get_boot_ns();
    struct flow_value *v = flows.lookup(&m->key);
    if (v && live(v, now, PF_MAP_FLOWS)) {
        add_to_entry(st, v, m, now, PF_CNT_METERED);
        return;
    }
    struct flow_value *r = resumed.lookup(&m->key);
    if (r && live(r, now, PF_MAP_RESUMED)) {
        add_to_entry(st, r, m, now, PF_CNT_RESUMED);
        return;
    }
    if (v && r) {
        /* both expired and neither taken out yet: the agent is behind */
        st->counters[PF_CNT_SWEEP_BEHIND] += m->packets;
        return;
    }
    create(ctx, data, data_end, st, m, hook, in_ifindex, now, v == 0);
}

/* RouterOS packet sampling: is this packet (or GSO skb) one of the sampled? */
static __always_inline int sampled(void)
{
#if SAMPLING_INTERVAL > 0
    __u32 zero = 0;
    __u64 *pos = sample_pos.lookup(&zero);
    if (!pos)
        return 1;
    __u64 p = *pos;
#if SAMPLING_SPACE > 0
    *pos = p + 1 >= SAMPLING_INTERVAL + SAMPLING_SPACE ? 0 : p + 1;
    return p < SAMPLING_INTERVAL;
#else
    *pos = p + 1 >= SAMPLING_INTERVAL ? 0 : p + 1;
    return p == 0;
#endif
#else
    return 1;
#endif
}

static __always_inline int is_own_export(struct pkt_meta *m)
{
#if PF_OWN_EXPORT
    if (m->key.protocol != IPPROTO_UDP)
        return 0;
    struct own_key k;
    __builtin_memcpy(k.src_addr, m->key.src_addr, 16);
    __builtin_memcpy(k.dst_addr, m->key.dst_addr, 16);
    k.src_port = m->key.src_port;
    k.dst_port = m->key.dst_port;
    return own_export.lookup(&k) != 0;
#else
    return 0;
#endif
}

/* gso: segments and segment payload size of a GSO/GRO skb (0 otherwise).
 * Such a skb is counted as the packets it was or will be on the wire: their
 * IP bytes are the payload plus one set of headers per segment. */
static __always_inline void process(void *ctx, void *data, void *data_end, __u32 ifindex,
                                    __u32 hook, __u8 direction, __u32 in_ifindex,
                                    __u32 gso_segs, __u32 gso_size, __u32 frame_len,
                                    __u32 hw_vlan)
{
    struct iface_stats *st = stats_for(ifindex, hook);
    if (!st)
        return;   /* cannot happen: the overflow array always has its element */
    struct pkt_meta m = {};
    m.packets = 1;
    int r = parse_packet(data, data_end, &m, hw_vlan, is_l3_link(ifindex));
    __u32 l3_len = frame_len > m.l3_off ? frame_len - m.l3_off : 0;
    if (gso_segs > 1 && r == PARSE_OK && gso_size > 0 && l3_len > 0) {
        __u32 hdr = m.ip_header_length + m.l4_header_length;
        __u32 payload = l3_len > hdr ? l3_len - hdr : 0;
        m.packets = gso_segs;
        m.bytes = (__u64)l3_len + (__u64)(gso_segs - 1) * hdr;
        __u32 last = payload - (gso_segs - 1) * gso_size;
        m.length_max = (__u16)(hdr + (payload < gso_size ? payload : gso_size));
        m.length_min = (__u16)(hdr + (last < gso_size ? last : gso_size));
    } else {
        m.length_min = (__u16)m.bytes;
        m.length_max = (__u16)m.bytes;
    }
    /* per-CPU values: plain adds, no atomics needed */
    st->counters[PF_CNT_PACKETS_SEEN] += m.packets;
    if (r == PARSE_NOT_IP) {
        st->counters[PF_CNT_NOT_IP] += m.packets;
        return;
    }
    if (r != PARSE_OK) {
        st->counters[PF_CNT_UNPARSABLE] += m.packets;
        return;
    }
    /* Our own datagrams only ever leave this host: checked on egress only
     * (hook is a constant in each entry point, so XDP and TC ingress skip it). */
    if (hook == PF_HOOK_TC_EGRESS && is_own_export(&m)) {
        st->counters[PF_CNT_OWN_EXPORT] += m.packets;
        return;
    }
    if (!sampled()) {
        st->counters[PF_CNT_SAMPLED_OUT] += m.packets;
        return;
    }
    m.key.ifindex = ifindex;
    m.key.direction = direction;
    meter(ctx, data, data_end, st, &m, hook, in_ifindex);
}

int pyflow_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    process(ctx, data, data_end, ctx->ingress_ifindex, PF_HOOK_XDP, 0, ctx->ingress_ifindex,
            0, 0, 0, 0);
    return XDP_PASS;
}

static __always_inline void process_skb(struct __sk_buff *skb, __u32 hook, __u8 direction)
{
#ifdef PF_TEST_VLAN_FROM_MARK
    /* tests/bpf only (KernelSettings.test_vlan_from_mark): a test run cannot
     * set the skb's VLAN tag through its context, so the test passes it in
     * the mark (bit 16: 802.1ad) and it is put where the stack puts the tag
     * of every frame it receives, before TC sees it. */
    if (skb->mark)
        bpf_skb_vlan_push(skb, bpf_htons(skb->mark & 0x10000 ? PF_ETH_P_8021AD : PF_ETH_P_8021Q),
                          skb->mark & 0xFFFF);
#endif
    __u32 len = skb->len;
    if ((__u32)(skb->data_end - skb->data) < len &&
        (__u32)(skb->data_end - skb->data) < PF_PULL_LEN)
        bpf_skb_pull_data(skb, len < PF_PULL_LEN ? len : PF_PULL_LEN);
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __u32 in = hook == PF_HOOK_TC_EGRESS ? skb->ingress_ifindex : skb->ifindex;
    /* The stack has moved the outer tag out of the frame into the skb by now
     * (on receive before TC ingress; a VLAN device's tag at egress until the
     * driver or validate_xmit puts it back): read it from there. */
    __u32 hw_vlan = skb->vlan_present ? PF_HW_VLAN | skb->vlan_tci : 0;
    process(skb, data, data_end, skb->ifindex, hook, direction, in, skb->gso_segs,
            skb->gso_size, len, hw_vlan);
}

int pyflow_tc_ingress(struct __sk_buff *skb)
{
    process_skb(skb, PF_HOOK_TC_INGRESS, 0);
    return TC_ACT_UNSPEC;
}

int pyflow_tc_egress(struct __sk_buff *skb)
{
    process_skb(skb, PF_HOOK_TC_EGRESS, 1);
    return TC_ACT_UNSPEC;
}
