"""What a vector looks like: geometry against chance, interference, intervals for rates and shares, file info."""
