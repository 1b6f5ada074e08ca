"""GET handlers of the endpoint table (models, version, health, metrics, playground)."""
