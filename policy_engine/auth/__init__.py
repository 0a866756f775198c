"""Who is asking: the subject's access token."""
