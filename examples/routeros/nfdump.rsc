# RouterOS Traffic Flow guide, nfdump/nfcapd (NetFlow v5).  The guide writes
# dst-address=<nfcapd-ip>; 192.0.2.12 stands in for it.
/ip traffic-flow target
add dst-address=192.0.2.12 port=9995 version=5
