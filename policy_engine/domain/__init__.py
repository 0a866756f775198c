"""The values every part shares: requests, decisions, reasons and the documented error codes."""
