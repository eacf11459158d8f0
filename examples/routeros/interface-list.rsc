# RouterOS Traffic Flow guide: export flows only from some interfaces, with an
# interface list.  ether1 and bridge are RouterOS names: on a Linux host, map them,
# e.g. pyflow check --routeros interface-list.rsc --map-interface ether1=eth0,bridge=br0
/interface list
add name=flow-interfaces
/interface list member
add list=flow-interfaces interface=ether1
add list=flow-interfaces interface=bridge
/ip traffic-flow
set enabled=yes interfaces=flow-interfaces
