"""Page bodies: each module has a ``render()`` the page script calls (importing runs nothing)."""
