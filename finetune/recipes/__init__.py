"""Recipes: each public function runs one job top to bottom (setup → work → save). Recipes never import each other."""
