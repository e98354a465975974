"""What users and operators see: the configuration, the built-in provider table, the wire protocol, the errors."""
