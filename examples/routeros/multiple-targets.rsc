# RouterOS Traffic Flow guide: the same flows go to every target.
/ip traffic-flow target
add dst-address=192.0.2.60 port=2055 version=ipfix
add dst-address=192.0.2.70 port=9995 version=9
