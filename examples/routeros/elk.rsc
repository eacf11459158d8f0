# RouterOS Traffic Flow guide, ElastiFlow/Logstash to Elasticsearch.  The guide
# writes dst-address=<logstash-ip>; 192.0.2.14 stands in for it.
/ip traffic-flow
set enabled=yes interfaces=all cache-entries=4k \
    active-flow-timeout=1m inactive-flow-timeout=15s
/ip traffic-flow target
add dst-address=192.0.2.14 port=2055 version=ipfix \
    v9-template-refresh=20
