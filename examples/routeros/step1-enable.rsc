# RouterOS Traffic Flow guide, "Step 1": turn traffic flow on, on all interfaces.
/ip traffic-flow
set enabled=yes interfaces=all
