# RouterOS Traffic Flow guide, "Step 3 - Configure IPFIX Fields": print changes nothing, then NAT events on.
/ip traffic-flow ipfix print
/ip traffic-flow ipfix set nat-events=yes
