"""The pytest side: the plugin, its fixtures, the testinfra backend, scheduling and the matrix."""
