"""Protection applied to a message before it is sent."""
