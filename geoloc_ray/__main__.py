import sys

from geoloc_ray.cli import main

sys.exit(main())
