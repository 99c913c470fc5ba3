"""The control plane's foundations: the one Settings object, and every SQL table and migration."""
