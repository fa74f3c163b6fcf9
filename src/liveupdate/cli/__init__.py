"""luoctl, the operator's command-line tool."""
