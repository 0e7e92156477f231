"""The demo application and its topology (`mesh up --demo`)."""
