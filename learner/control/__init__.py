"""The Control service a running ``fleetrl train`` hosts (``fleetrl.control.v1``).

``registry.py`` the run-time reward models (plain logic, thread-safe);
``service.py`` the thin servicer (protobuf <-> Python, errors -> status codes)
and the server's start.
"""
