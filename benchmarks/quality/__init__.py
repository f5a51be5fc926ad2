"""Quality studies: do the seed papers' claims about weight averaging hold with fastavg on real data?"""
