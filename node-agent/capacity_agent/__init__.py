"""The node agent: substrate collectors, measurement window, publisher and voter."""
