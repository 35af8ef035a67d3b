"""The host agent: reads and writes application data on its host for the appliance."""
