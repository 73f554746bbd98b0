"""What outlives a run: the token cache (``cache``) and the cohort bank of normal studies (``bank``)."""
