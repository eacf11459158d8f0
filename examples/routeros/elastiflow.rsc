# RouterOS Traffic Flow guide, ElastiFlow.  The guide writes dst-address=<elastiflow-ip>;
# 192.0.2.11 stands in for it.
/ip traffic-flow target
add dst-address=192.0.2.11 port=2055 version=ipfix
