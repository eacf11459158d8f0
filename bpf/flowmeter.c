// SPDX-License-Identifier: Apache-2.0
/*
 * pyflow flow meter: XDP program (TC later shares the same parser).
 *
 * Compiled at start by bcc.  Settings arrive as -D flags from
 * pyflow/kernel/loader.py:
 *   CACHE_ENTRIES     size of the flows hash map (RouterOS cache-entries)
 *   INACTIVE_NS       inactive-flow-timeout in ns: an entry idle this long is
 *                     never written again (packets go to the spill ring)
 *   END_IDLE_NS       idle time after which a flow that saw TCP FIN or RST
 *                     is over (same rule: never written again)
 *   MAX_IPV6_EXT      IPv6 extension headers skipped at most
 *
 * The program never changes traffic: every path returns XDP_PASS.
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
#ifndef SPILL_RING_PAGES
#define SPILL_RING_PAGES 64
#endif

#define PF_TCP_FIN 0x01
#define PF_TCP_RST 0x04

#define PF_ETH_P_8021Q  0x8100
#define PF_ETH_P_8021AD 0x88A8
#define PF_ETH_P_IP     0x0800
#define PF_ETH_P_IPV6   0x86DD

BPF_TABLE("hash", struct flow_key, struct flow_value, flows, CACHE_ENTRIES);
/* Interface stats: a per-CPU array slot (ifindex * 3 + hook) for the usual
 * small ifindex (an array lookup is a bounds check and an add, a hash lookup
 * costs ~28 ns more per packet, see docs/benchmarks.md); a per-CPU hash for
 * the rest; an overflow slot when even that is full (never silently lost). */
BPF_PERCPU_ARRAY(iface_slots, struct iface_stats, IFACE_ARRAY_IFINDEX * 3);
BPF_PERCPU_HASH(iface_stats, struct iface_key, struct iface_stats, MAX_IFACE_STATS);
BPF_PERCPU_ARRAY(overflow_stats, struct iface_stats, 1);
BPF_PERCPU_ARRAY(flow_seq, __u64, 1);
BPF_RINGBUF_OUTPUT(spill, SPILL_RING_PAGES);
/* Update of this map-in-map from user space waits for an RCU grace period:
 * the agent's barrier between "read idle entries" and "delete them". */
BPF_ARRAY(barrier_inner, __u32, 1);
BPF_ARRAY_OF_MAPS(barrier, "barrier_inner", 1);

struct vlan_hdr_pf {
    __be16 tci;
    __be16 proto;
};

/* What the parser extracts from one packet. */
struct pkt_meta {
    struct flow_key key;
    __u64 bytes;
    __u32 tcp_flags;
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

static __always_inline void count(struct iface_stats *st, __u32 id)
{
    if (id < PF_CNT_MAX)
        st->counters[id] += 1;   /* per-CPU value: no atomics needed */
}

enum parse_result { PARSE_OK = 0, PARSE_NOT_IP, PARSE_BAD };

static __always_inline int parse_l4(void *l4, void *data_end, __u8 proto,
                                    struct pkt_meta *m)
{
    if (proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return PARSE_BAD;
        m->key.src_port = bpf_ntohs(th->source);
        m->key.dst_port = bpf_ntohs(th->dest);
        /* flags byte: the 14th byte of the TCP header */
        m->tcp_flags = ((__u8 *)th)[13];
    } else if (proto == IPPROTO_UDP || proto == 132 /* SCTP */) {
        struct udphdr *uh = l4;   /* SCTP ports sit at the same offsets */
        if ((void *)(uh + 1) > data_end)
            return PARSE_BAD;
        m->key.src_port = bpf_ntohs(uh->source);
        m->key.dst_port = bpf_ntohs(uh->dest);
    } else if (proto == IPPROTO_ICMP || proto == 58 /* ICMPv6 */) {
        __u8 *ic = l4;
        if ((void *)(ic + 2) > data_end)
            return PARSE_BAD;
        /* NetFlow convention: dst port = type * 256 + code, src port 0 */
        m->key.dst_port = ((__u16)ic[0] << 8) | ic[1];
    }
    return PARSE_OK;
}

static __always_inline int parse_packet(void *data, void *data_end,
                                        struct pkt_meta *m)
{
    struct ethhdr *eth = data;
    void *cur;
    __u16 proto;

    if ((void *)(eth + 1) > data_end)
        return PARSE_BAD;
    proto = bpf_ntohs(eth->h_proto);
    cur = eth + 1;

#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != PF_ETH_P_8021Q && proto != PF_ETH_P_8021AD)
            break;
        struct vlan_hdr_pf *vh = cur;
        if ((void *)(vh + 1) > data_end)
            return PARSE_BAD;
        proto = bpf_ntohs(vh->proto);
        cur = vh + 1;
    }

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
        return parse_l4(l4, data_end, iph->protocol, m);
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
        return parse_l4(l4, data_end, next, m);
    }
    return PARSE_NOT_IP;
}

static __always_inline void spill_packet(struct iface_stats *st, struct pkt_meta *m, __u64 now)
{
    struct spill_event *ev = spill.ringbuf_reserve(sizeof(struct spill_event));
    if (!ev) {
        count(st, PF_CNT_SPILL_LOST);
        return;
    }
    __builtin_memcpy(&ev->key, &m->key, sizeof(ev->key));
    ev->tcp_flags = m->tcp_flags;
    ev->bytes = m->bytes;
    ev->ts_ns = now;
    spill.ringbuf_submit(ev, 0);
    count(st, PF_CNT_SPILLED);
    st->metered_bytes += m->bytes;
}

/* Add one packet to an existing entry.  An expired entry (idle for
 * INACTIVE_NS, or for END_IDLE_NS after FIN/RST) is never written: the agent
 * may be reading it for the last time before deleting it, so the packet is
 * spilled instead (see "Exact deletes" in docs/architecture.md). */
static __always_inline void add_to_entry(struct iface_stats *st, struct flow_value *v,
                                         struct pkt_meta *m, __u64 now)
{
    __s64 idle = (__s64)(now - v->last_seen_ns);
    __s64 limit = (v->tcp_flags & (PF_TCP_FIN | PF_TCP_RST)) ? (__s64)END_IDLE_NS
                                                              : (__s64)INACTIVE_NS;
    if (idle >= limit) {
        spill_packet(st, m, now);
        return;
    }
    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, m->bytes);
    if (idle > 0)
        v->last_seen_ns = now;
    if (m->tcp_flags & ~v->tcp_flags)
        __sync_fetch_and_or(&v->tcp_flags, m->tcp_flags);
    count(st, PF_CNT_METERED);
    st->metered_bytes += m->bytes;
}

static __always_inline void meter(struct iface_stats *st, struct pkt_meta *m)
{
    __u64 now = bpf_ktime_get_boot_ns();
    struct flow_value *v = flows.lookup(&m->key);
    if (v) {
        add_to_entry(st, v, m, now);
        return;
    }
    /* flow_seq: per-CPU count of entries created (their sum is the
     * flows-created metric) and the source of unique flow ids */
    __u32 zero = 0;
    __u64 *seq = flow_seq.lookup(&zero);
    __u64 id = 0;
    if (seq) {
        *seq += 1;
        id = ((__u64)bpf_get_smp_processor_id() << 48) | (*seq & 0xFFFFFFFFFFFFULL);
    }
    struct flow_value nv = {};
    nv.packets = 1;
    nv.bytes = m->bytes;
    nv.first_seen_ns = now;
    nv.last_seen_ns = now;
    nv.flow_id = id;
    nv.tcp_flags = m->tcp_flags;
    int err = flows.insert(&m->key, &nv);
    if (err != 0 && seq)
        *seq -= 1;   /* not created; the same CPU, so the id is simply reused */
    if (err == 0) {
        count(st, PF_CNT_METERED);
        st->metered_bytes += m->bytes;
        return;
    }
    /* Lost the insert race to another CPU: add to its entry instead. */
    v = flows.lookup(&m->key);
    if (v) {
        add_to_entry(st, v, m, now);
        return;
    }
    count(st, PF_CNT_CACHE_FULL);
}

static __always_inline void process(void *data, void *data_end, __u32 ifindex,
                                    __u32 hook, __u8 direction)
{
    struct iface_stats *st = stats_for(ifindex, hook);
    if (!st)
        return;   /* cannot happen: the overflow array always has its element */
    struct pkt_meta m = {};
    count(st, PF_CNT_PACKETS_SEEN);
    int r = parse_packet(data, data_end, &m);
    if (r == PARSE_NOT_IP) {
        count(st, PF_CNT_NOT_IP);
        return;
    }
    if (r != PARSE_OK) {
        count(st, PF_CNT_UNPARSABLE);
        return;
    }
    m.key.ifindex = ifindex;
    m.key.direction = direction;
    meter(st, &m);
}

int pyflow_xdp(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    process(data, data_end, ctx->ingress_ifindex, PF_HOOK_XDP, 0);
    return XDP_PASS;
}
