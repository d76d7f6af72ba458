"""Wire protocols of fleetrl (gRPC, protobuf).

The reward-model and control services (``fleetrl.reward.v1``,
``fleetrl.control.v1``) and their generated code live here. The package is
the bottom of the import order: ``learner`` -> ``actors`` -> ``protos``.
"""
