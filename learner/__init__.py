"""The learner, the training driver, configuration and the ``fleetrl`` CLI.

``learner.core_algos`` (advantages and losses) is pure torch and imports
neither Ray nor any other fleetrl module.
"""
