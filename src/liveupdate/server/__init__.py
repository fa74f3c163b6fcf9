"""luod, the daemon: serves the LUO device on a Unix socket and reboots itself."""
