"""The builder: optimized graph -> Plan (layers, tactics, memory) -> Engine."""
