"""FHIR R4 (4.0.1) API: teleconsult orders, tasks, the network directory."""
