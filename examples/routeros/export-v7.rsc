# 2025-11-25 10:42:17 by RouterOS 7.15.3
# software id = ABCD-1234
#
# model = RB5009UG+S+
# serial number = HEX0123456789
#
# What `/export` prints on RouterOS 7 for a router that exports flows, as a
# MikroTik user pastes it (only the menus pyflow reads are kept here).
/interface list
add comment="WAN and LAN ports" name=flow-interfaces
/interface list member
add interface=ether1 list=flow-interfaces
add interface=ether2 list=flow-interfaces
add disabled=yes interface=ether5 list=flow-interfaces
/ip traffic-flow
set cache-entries=128k enabled=yes interfaces=flow-interfaces \
    packet-sampling=yes sampling-interval=10 sampling-space=90
/ip traffic-flow ipfix
set nat-events=yes tcp-seq-num=no tcp-ack-num=no
/ip traffic-flow target
add dst-address=192.0.2.50 version=ipfix comment="ntopng"
add dst-address=2001:db8::51 port=9995 src-address=2001:db8::1 \
    v9-template-timeout=1m
add disabled=yes dst-address=192.0.2.52 version=5
