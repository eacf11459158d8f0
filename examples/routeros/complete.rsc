# RouterOS Traffic Flow guide, "Complete example": ntopng on IPFIX and a backup
# nfcapd on NetFlow v5.
# Enable Traffic Flow on all interfaces
/ip traffic-flow
set enabled=yes interfaces=all cache-entries=16k \
    active-flow-timeout=30m inactive-flow-timeout=15s
# Export to ntopng (IPFIX) and a backup nfcapd (NetFlow v5)
/ip traffic-flow target
add dst-address=192.0.2.50 port=2055 version=ipfix \
    v9-template-refresh=20 v9-template-timeout=30m
add dst-address=192.0.2.51 port=9995 version=5
