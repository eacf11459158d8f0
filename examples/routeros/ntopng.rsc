# RouterOS Traffic Flow guide, ntopng.  The guide writes dst-address=<ntopng-ip>;
# 192.0.2.10 (a documentation address) stands in for it: put your ntopng host here.
/ip traffic-flow target
add dst-address=192.0.2.10 port=2055 version=ipfix \
    v9-template-refresh=20 v9-template-timeout=30m
