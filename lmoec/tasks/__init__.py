"""Built-in tasks for ablations (MQAR)."""
