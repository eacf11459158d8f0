# RouterOS 6 wrote a target as address=IP:PORT; pyflow reads it too.
/ip traffic-flow
set enabled=yes active-flow-timeout=1h30m inactive-flow-timeout=00:00:15
/ip traffic-flow target
add address=192.0.2.50:2055 version=9
