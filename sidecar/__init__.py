"""The data plane: one trio proxy process per service instance."""
