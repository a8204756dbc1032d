"""The `vmmesh` command line (installed as the ``vmmesh_cli`` package)."""
