"""The one place that knows NATS: a trio-native client and the nats-server launcher."""
