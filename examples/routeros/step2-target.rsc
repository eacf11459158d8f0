# RouterOS Traffic Flow guide, "Step 2": one IPFIX target.
/ip traffic-flow target
add dst-address=192.0.2.50 port=2055 version=ipfix
