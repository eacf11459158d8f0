# RouterOS Traffic Flow guide, pmacct nfacctd (to InfluxDB and Grafana).  The guide
# writes dst-address=<pmacct-ip>; 192.0.2.13 stands in for it.
/ip traffic-flow target
add dst-address=192.0.2.13 port=2055 version=ipfix
