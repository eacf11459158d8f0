"""What the host knows about a flow that its packets do not carry.

* :mod:`pyflow.host.lpm`: a vectorised longest-prefix match over IPv4 and
  IPv6 prefixes (``PrefixTable``), shared by the routing table and the AS file;
* :mod:`pyflow.host.routes`: the routing table (main table, plus the local
  table's own addresses) and a watcher that follows it;
* :mod:`pyflow.host.conntrack`: NAT translations and NAT events from conntrack;
* :mod:`pyflow.host.asn`: a prefix-to-AS file.

:mod:`pyflow.enrich` puts them together on a record batch.
"""
